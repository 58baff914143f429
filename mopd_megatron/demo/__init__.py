"""The CPU demo's toy world: tokenizer, tasks, base student, teachers, evaluation.

Entry points: `demo.toy_world.build_world` / `load_world` and `demo.evaluate.evaluate`.
"""

"""Teacher stage: per-domain teacher servers that score the student's tokens (prefill only)."""

from mopd_megatron.teachers.pool import TeacherPool, check_vocabulary, teacher_for

__all__ = ["TeacherPool", "check_vocabulary", "teacher_for"]

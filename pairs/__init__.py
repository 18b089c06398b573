"""Stage two: invert the teacher (data -> noise) into a sharded, reusable pair cache."""

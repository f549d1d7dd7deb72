"""Rollout engines other than the native decoder (`alignrl.rollout.NativeEngine`), each behind its own extra."""

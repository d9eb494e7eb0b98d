"""Tests that need a verbs device: run them in the soft-RoCE guest with tools/rxe-test.sh."""

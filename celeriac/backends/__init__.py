"""Result backends: keep each task's state and result by task id. See `base.ResultBackend`."""

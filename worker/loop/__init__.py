"""The main loop: poll, hand off, commit, drain; start-up and the progress lines."""

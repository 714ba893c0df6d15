"""Logging shared by ausd and aus-server: journald-native records with
priorities and fields under systemd, plain lines otherwise (setup.py). It
talks to the journal's socket, so it lives beside the pure core, not in it."""

"""Upkeep: what keeps LXD and the records tidy, off the hot paths.

- loop.py: the supervised loop that runs the chores below on their periods (`Upkeep`);
- sweep.py: prepared containers never asked for, and containers no live step owns;
- templates.py: template containers (made, copied, bounded; the stale ones swept);
- retention.py: the image retention reconciler; inventory.py: which AMIs are live.
"""

"""What the bridge watches: panels (heartbeat watchdog), open alarms and their timelines."""

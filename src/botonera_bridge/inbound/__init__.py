"""WhatsApp to the bridge: the gateway WebSocket, Cloud API webhooks, the inbox and the commands."""

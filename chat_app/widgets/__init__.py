"""The widgets the chat screen is made of."""

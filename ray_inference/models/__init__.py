"""Finding models on disk (registry) and loading them onto a device (loader)."""

"""The VPD model: backbone (SD v1 VAE + UNet), text side, heads, checkpoint loading."""

"""Media codecs shared by the loader and the towers: audio decoding and log-mel, JPEG decoding on the device."""

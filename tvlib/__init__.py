"""Task vectors in the SAE basis."""

"""Reading raw text, preparing token files and serving training and evaluation windows."""

"""Reading and augmenting images: files, the workers' transforms, the device decoder, the synthetic set."""

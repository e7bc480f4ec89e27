"""Data: the synthetic shapes world, URL lists, img2dataset download, webdataset loading."""

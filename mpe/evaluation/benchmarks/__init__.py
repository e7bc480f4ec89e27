"""Standard retrieval and classification benchmarks read from the local files users already have
(Karpathy JSON, CLIP_benchmark webdataset, ImageFolder, NegBench CSV), and their evaluation."""

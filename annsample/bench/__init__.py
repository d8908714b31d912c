"""The benchmarks behind ``annsample bench NAME``, one module each: ``samplers`` (sampler quality on
a trained run), ``stall`` (training stall of index refresh), ``step`` (every sampler inside the
training step), ``index`` (recall against search time of index configurations), ``refresh`` (index
build / re-add / retrain cost), ``ivf`` (torch IVF against FAISS IVF and exact search), ``ddp``
(distributed-training cost) and ``metric`` (recall of the index metrics)."""

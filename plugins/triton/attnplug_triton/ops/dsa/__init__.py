"""DeepSeek Sparse Attention kernels (DESIGN §8): the lightning indexer's exact top-k, scored a
bounded block of queries at a time (``topk_blocked.dsa_indexer_topk_threshold``, served;
``dsa_indexer_topk_blocked`` selects the same through 64-bit keys), the sparse
attention over the selected keys, forward and backward (``sparse.sparse_attention``), and the
indexer's KL loss against the main attention without a dense ``[B, H, T, S]`` tensor
(``kl.indexer_kl_loss``). ``naive.py`` holds the plain-PyTorch references the tests compare
against; ``scores.py`` the Triton helpers the indexer kernels share.
"""

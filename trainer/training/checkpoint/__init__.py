"""Checkpoints in ``RUN_DIR/checkpoints``, written atomically, the last k kept.

DDP and a single process (whatever its strategy) write one file ``ckpt-N.pt``: a plain dict of tensors and Python
containers, read back with ``weights_only=True``. FSDP2 over more than one rank writes a directory ``ckpt-N``: the
sharded model and optimizer as a torch.distributed.checkpoint (DCP), each rank its own shards, beside
``train_state.pt`` (everything else). Both hold the model and the optimizer under the model's own parameter names
(torch.distributed.checkpoint.state_dict), so either resumes into either strategy and any world size. What reads
them for evaluation and export is trainer.eval.weights; the reader of a DCP directory's metadata
(``check_dcp_metadata``, which refuses what would run code) and of a whole DCP checkpoint (``read_dcp``) are in
``files``, beside the writers.

files: the checkpoints of a run, written atomically, and read back weights-only (a DCP directory's metadata through
a safe unpickler); state: the model, optimizer and EMA written and loaded in either format, on every rank; manager:
what a training run's checkpoint holds, and which one a run resumes from.
"""

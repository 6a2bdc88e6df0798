"""Applications built on the library: the personalisation workflow (prepare, pretrain,
fine-tune, score), base checkpoints, the demo and its report, and ``recpeft bench``.

May import everything below it: ``recpeft.train``, ``recpeft.datasets``, ``recpeft.models``,
``recpeft.metrics``, ``recpeft.peft``, ``recpeft.layers``, ``recpeft.kernels``,
``recpeft.utils``. Only ``recpeft.cli`` imports it. Modules are imported one by one (this file
imports nothing), so a command pays only for what it uses.
"""

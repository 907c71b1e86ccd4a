"""Training: the one loop (``loop``), the ``Task`` protocol it runs (``task``), the tasks of the denoiser
(``denoiser``) and of the autoencoder and consistency decoder (``decoder``, ``decoder_config``), the table of run
kinds (``kinds``) and the presets (``presets``). ``cmkit.train(cfg)`` is ``loop.train``."""

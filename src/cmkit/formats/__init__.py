"""File formats: cmkit's model and run directories, the shipped models (the zoo), and readers of the formats the
field released (EDM pickles, OpenAI's Flax CIFAR-10 checkpoints, OpenAI/diffusers ADM weights, the Consistency
Decoder's TorchScript file) and of CIFAR-10's archive. Nothing here builds a network: ``cmkit.load`` does."""

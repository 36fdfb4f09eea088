"""What the evaluations of an encoder (finetuning, the linear probe, k-NN) share."""

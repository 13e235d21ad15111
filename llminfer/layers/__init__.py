"""Building blocks of the network. Each layer owns its parameters and how checkpoint tensors load into them."""

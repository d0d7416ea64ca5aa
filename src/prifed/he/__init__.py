"""Homomorphic aggregation with CKKS (TenSEAL): the coordinator adds ciphertexts.

Sites encrypt their weighted updates under a key the coordinator does not
hold. The coordinator adds the ciphertexts and relays the encrypted sum back,
so it never has an update or the global model in the clear. Each site
keeps its own copy of the global model and of the server optimiser state.

A round, from the coordinator's side:

1. send each selected site the encrypted aggregate of the previous round
   (the initial model in round 1);
2. each site decrypts it, steps its model (FedAvg, FedAdam, FedYogi or
   FedAdagrad), trains, and replies with ``weight * (local - global)``
   encrypted, plus its weight and a count in two header slots;
3. add the replies with :class:`EncryptedSum`, using a context without the
   secret key, and keep the encrypted sum for the next round.

Modules: ``params`` (parameter choice), ``keys`` (contexts and rotation),
``packing`` (slot layout and wire form), ``combine`` (coordinator),
``site`` (site), ``optim`` (server optimisers), ``cli`` (``prifed he``).
This package imports none of them, so ``prifed --help`` does not load TenSEAL.
"""

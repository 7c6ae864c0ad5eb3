"""mkmoe: dense models into a Mixture of Experts (mergekit-moe configs), on the shared engine."""

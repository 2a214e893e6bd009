"""Learned re-rankers a practitioner would try first: LambdaMART and a PRM-style listwise
transformer, on hand-made features of the training periods."""

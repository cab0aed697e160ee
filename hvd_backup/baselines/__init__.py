"""The baselines the paper compares with, behind the interface the trainer's loop uses: plain synchronous SGD
(``hvd.DistributedOptimizer``) and asynchronous SGD on one-sided MPI."""

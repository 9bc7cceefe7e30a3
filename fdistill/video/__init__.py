"""HiAR-style autoregressive video: samplers and schedules (``hiar``), teacher training and
self-rollout f-distillation (``distill``), motion and drift metrics (``metrics``)."""

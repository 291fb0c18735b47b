"""Early exit: exit heads after intermediate layers, exit criteria, batched early-exit inference, calibration."""

"""Neural parts: the router, the MoLE layer and fused expert bank, peft adapter dirs, the MoLE model."""

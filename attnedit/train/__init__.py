"""Training recipes that produce attnedit adapters (AttenCraft concepts, CLEAR students)."""

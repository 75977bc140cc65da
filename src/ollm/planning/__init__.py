"""What goes where: memory accounting, placement over GPU / pinned RAM / disk, and the cost model."""

"""sala_train.conversion: MiniCPM-4 checkpoint + layer plan -> SALA checkpoint (arrives with the conversion issue)."""

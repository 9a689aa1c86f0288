"""MRI physics: centred FFTs, undersampling masks, coil sensitivities, the SENSE operator."""

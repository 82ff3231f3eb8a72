"""The bottom floor: helpers every job kind uses (storage access, output folders); nothing here imports the
rest of clipforge except `clipforge.errors`."""

"""Reading, writing and partitioning HDF5 datasets; each rank reads only its own rows."""

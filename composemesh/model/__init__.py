"""The mesh's own vocabulary: frozen values every other package reads and none of them owns."""

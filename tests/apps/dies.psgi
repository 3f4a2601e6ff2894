# An app that dies while loading (robustness tests).
die "boom: this app refuses to load\n";

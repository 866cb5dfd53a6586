"""One CNI command per module (ADD, DEL, CHECK, GC, STATUS), plus `stats` for people.

Imports the datapath and the contract below it; never the node layer above."""

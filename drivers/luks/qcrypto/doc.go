// Package qcrypto is the QAPI side of LUKS encryption that the luks driver
// and qcow2's native encryption share: QEMU's QCryptoBlockCreateOptionsLUKS
// (CreateFields), QCryptoBlockAmendOptionsLUKS with keyslot amendment
// (AmendOptions, Keyslots) and QCryptoBlockInfoLUKS (Info and the luks
// node's format-specific data). The on-disk format is luksfmt's; GraphError
// maps luksfmt's sentinel errors to graph's, which luksfmt knows nothing
// of.
package qcrypto

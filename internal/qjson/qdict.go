package qjson

import (
	"slices"
	"sort"
)

// Bucket is the bucket of a member name in a QEMU QDict
// (qobject/qdict.c: tdb_hash modulo QDICT_BUCKET_MAX, 512). A QDict walks
// its buckets in order and inserts each entry at the head of its bucket,
// so the order in which QEMU iterates and prints an object's members
// follows from their names and their insertion order alone.
func Bucket(name string) uint32 {
	v := uint32(0x238F13AF) * uint32(len(name))
	for i := 0; i < len(name); i++ {
		v += uint32(name[i]) << (uint(i) * 5 % 24)
	}
	return (1103515243*v + 12345) % 512
}

// SortQDict sorts members, given in insertion order, into the order a
// QDict iterates them: by bucket, and within a bucket newest first. name
// returns a member's name.
func SortQDict[T any](members []T, name func(*T) string) {
	slices.Reverse(members)
	sort.SliceStable(members, func(i, j int) bool {
		return Bucket(name(&members[i])) < Bucket(name(&members[j]))
	})
}

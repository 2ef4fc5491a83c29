// A fixed-size ascending list of (distance, index): the running k best of one query.
#pragma once
#include <cstdint>

namespace diffmem::knn {

// Inserts (d, j) into the ascending list of length k, dropping the last entry. Empty
// slots (index -1) form the list's tail and rank after any distance, +inf included.
// Callers present candidates in increasing index order and only when d < dist[k-1] (or
// the last slot is empty), so equal distances keep the smaller index first (the tie
// rule) without comparing indices.
template <typename D>
inline void sorted_insert(D* dist, int64_t* idx, int64_t k, D d, int64_t j) {
  int64_t p = k - 1;
  while (p > 0 && (idx[p - 1] < 0 || dist[p - 1] > d)) {
    dist[p] = dist[p - 1];
    idx[p] = idx[p - 1];
    --p;
  }
  dist[p] = d;
  idx[p] = j;
}

}  // namespace diffmem::knn

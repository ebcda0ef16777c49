#!/bin/bash
# Wall time and peak RSS of sct_deepseg_lesion with and without -tta (median of 3 fresh processes), CPU, 2 threads.
set -u
IN=/tmp/sct_sitehead-benchmark/inputs
for img in ../shared/data/bids/sub-ms01/anat/sub-ms01_T2w.nii.gz $IN/phantom-sagittal*T2w.nii.gz $IN/phantom-spine*T2w.nii.gz; do
  for t in "" "-tta"; do
    for r in 1 2 3; do
      /usr/bin/time -f "%e %M" -o /tmp/tt.txt sct_deepseg_lesion -i $img -site montreal -threads 2 -o /tmp/tta_out.nii.gz -v 0 $t
      cat /tmp/tt.txt
    done | sort -n | sed -n 2p | awk -v i=$(basename $img) -v t="${t:-plain}" '{printf "%s %s wall %.2f s peak %d MB\n", i, t, $1, $2/1024}'
  done
done

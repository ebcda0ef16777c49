# subset.sh SRC DST site1 site2 ...: a BIDS subset of SRC's sites, by symlinks
src=$(readlink -f $1); dst=$2; shift 2
mkdir -p $dst/derivatives/labels $dst/derivatives/truth
cp $src/dataset_description.json $dst/
head -1 $src/participants.tsv > $dst/participants.tsv
for s in "$@"; do
  awk -F'\t' -v s=$s '$2==s' $src/participants.tsv >> $dst/participants.tsv
  for d in $src/sub-$s*; do ln -sfn $d $dst/; done
  for d in $src/derivatives/labels/sub-$s*; do ln -sfn $d $dst/derivatives/labels/; done
  for d in $src/derivatives/truth/sub-$s*; do [ -e "$d" ] && ln -sfn $d $dst/derivatives/truth/; done
done

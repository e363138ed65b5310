"""Train a SeqRec model from scratch.

python training/train.py --config training/configs/demo.yaml --output-dir outputs/demo
accelerate launch training/train.py --config training/configs/beauty.yaml mixed_precision=bf16
seqrec-hf train --config ...            # the same implementation (seqrec_hf.train)
"""

import sys

from seqrec_hf.train import main

if __name__ == "__main__":
    sys.exit(main())

"""Write a synthetic CT-like lesion detection dataset (nnDetection raw layout + MONAI datalist).

    python tools/make_synthetic.py --output_dir data/synthetic_easy --preset easy --seed 0
    python tools/make_synthetic.py --output_dir data/synthetic_realistic --preset realistic \\
        --num_training 60 --num_validation 20

Prints the path of the written datalist.json.
"""

import fire

from meddet.data.synthetic import generate_dataset

if __name__ == "__main__":
    fire.Fire(generate_dataset)

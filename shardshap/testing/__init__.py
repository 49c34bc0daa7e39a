"""What shardshap's own tests check against, shipped for anyone who extends it (as Opacus ships its
per-sample-gradient checks): small real models (`cases`), the plain training step and state equality
(`references`), and the backend contract checks a new backend must pass (`conformance`).

`cases` needs scikit-learn (digits) and transformers (tiny GPT-2 / Llama), installed by the `test` extra."""

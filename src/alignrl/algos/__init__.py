"""Pure tensor math: KL estimators, advantages, policy/value/preference losses, KL control."""

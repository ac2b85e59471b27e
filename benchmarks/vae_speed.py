"""VAE speed: training steps per second of dlatent's beta-VAE, FactorVAE and beta-TCVAE against pythae's, same networks, same data.

Both libraries train the same networks from the same initial weights: dlatent's networks of Locatello et al. (2019)
(`dlatent.networks.vae`: the convolutional encoder, the mirrored decoder, FactorVAE's 6 x 1000 discriminator), handed to
pythae as its encoder, decoder (with a sigmoid on the logits, since pythae's 'bce' loss takes probabilities) and
discriminator. The data are the same random binary 64x64 images (uint8 for dlatent, whose models read 0..255; floats in
[0, 1] for pythae, which reads them as they are), the batches the same size (64; FactorVAE 128, which both libraries split
into the two halves of Kim & Mnih's Algorithm 2), the optimizers Adam 1e-4 (FactorVAE's discriminator: 1e-4, betas 0.5, 0.9),
in each library's own implementation: dlatent's models use PyTorch's fused Adam, pythae's trainers the default one.
Each library trains with its own loop: dlatent with `dlatent.train.fit` (its `seconds` time the loop alone), pythae with its
trainer's `train_step` over one epoch of exactly `--steps` batches (BaseTrainer, AdversarialTrainer for FactorVAE), both
with their progress bars. The models compute what their papers ask in their own ways (pythae's beta-TCVAE estimates all three
KL terms from the sample, dlatent adds (beta - 1) TC to the closed-form KL; pythae's FactorVAE back-propagates the
discriminator's loss into the encoder too), so this times each library doing its own job on the same problem.

Runs come in pairs in one process, the order within a pair alternating, because whichever runs second is favoured on a busy
machine; the figure reported per model is the median over pairs of pythae's seconds per step over dlatent's (above 1:
dlatent is faster). pythae is not a dependency of dlatent: `pip install pythae` (or `pip install --target DIR pythae` and
PYTHONPATH=DIR) for this script only; without it the script says so and exits.

With --floor, each round also times the networks alone (beta-VAE and beta-TCVAE): the encoder and decoder, forward and
backward, on the same batches, with no loss and no optimizer. Both libraries pay that much every step, so the median of
pythae's seconds per step over it bounds the speed-up any training loop could reach on these networks.

    python benchmarks/vae_speed.py [--tiny] [--steps 20] [--pairs 5] [--models betavae factorvae betatcvae] [--threads 1] [--floor]
"""
import argparse, copy, gc, logging, os, statistics, sys, tempfile, time
import torch
from torch.utils.data import TensorDataset

from dlatent.train import TrainConfig, fit
from dlatent.models.vae import BetaVAEConfig, FactorVAEConfig, BetaTCVAEConfig, build_vae

MODELS = ('betavae', 'factorvae', 'betatcvae')


def import_pythae():
    "pythae's models, networks' base classes and trainers, or None when it is not installed."
    try:
        from pythae.models import BetaVAE, BetaVAEConfig as PBetaVAEConfig, FactorVAE, FactorVAEConfig as PFactorVAEConfig, BetaTCVAE, BetaTCVAEConfig as PBetaTCVAEConfig
        from pythae.models.nn import BaseEncoder, BaseDecoder
        from pythae.models.base.base_utils import ModelOutput
        from pythae.trainers import BaseTrainer, BaseTrainerConfig, AdversarialTrainer, AdversarialTrainerConfig
        from pythae.data.datasets import BaseDataset
    except ImportError as e:
        return None, e
    for name in list(logging.root.manager.loggerDict):                  # pythae's modules log every set-up step at INFO
        if name.startswith('pythae'): logging.getLogger(name).setLevel(logging.WARNING)
    return dict(BetaVAE=BetaVAE, PBetaVAEConfig=PBetaVAEConfig, FactorVAE=FactorVAE, PFactorVAEConfig=PFactorVAEConfig,
                BetaTCVAE=BetaTCVAE, PBetaTCVAEConfig=PBetaTCVAEConfig, BaseEncoder=BaseEncoder, BaseDecoder=BaseDecoder,
                ModelOutput=ModelOutput, BaseTrainer=BaseTrainer, BaseTrainerConfig=BaseTrainerConfig,
                AdversarialTrainer=AdversarialTrainer, AdversarialTrainerConfig=AdversarialTrainerConfig, BaseDataset=BaseDataset), None


def dlatent_config(name):
    return {'betavae': BetaVAEConfig(), 'factorvae': FactorVAEConfig(), 'betatcvae': BetaTCVAEConfig()}[name]


def make_pythae(P, name, reference, size):
    "pythae's model `name` on deep copies of the networks of the dlatent model `reference`."
    class Encoder(P['BaseEncoder']):
        def __init__(self, net): super().__init__(); self.net = net
        def forward(self, x):
            mu, logvar = self.net(x)
            return P['ModelOutput'](embedding=mu, log_covariance=logvar)

    class Decoder(P['BaseDecoder']):
        def __init__(self, net): super().__init__(); self.net = net
        def forward(self, z): return P['ModelOutput'](reconstruction=torch.sigmoid(self.net(z)))

    c = reference.cfg
    common = dict(input_dim=(1, size, size), latent_dim=c.z_dim, reconstruction_loss='bce')
    enc, dec = Encoder(copy.deepcopy(reference.encoder)), Decoder(copy.deepcopy(reference.decoder))
    if name == 'betavae': return P['BetaVAE'](P['PBetaVAEConfig'](beta=c.beta, **common), enc, dec)
    if name == 'betatcvae': return P['BetaTCVAE'](P['PBetaTCVAEConfig'](beta=c.beta, alpha=1.0, gamma=1.0, use_mss=False, **common), enc, dec)
    model = P['FactorVAE'](P['PFactorVAEConfig'](gamma=c.gamma, **common), enc, dec)
    model.discriminator = copy.deepcopy(reference.discriminator)          # the same 6 x 1000 network as dlatent's
    return model


def pythae_seconds_per_step(P, name, reference, images, bs, steps, size, out_dir):
    "Seconds per step of pythae's own trainer over one epoch of `steps` batches."
    model = make_pythae(P, name, reference, size)
    data = P['BaseDataset'](images.float() / 255, torch.zeros(len(images)))
    if name == 'factorvae':
        cfg = P['AdversarialTrainerConfig'](output_dir=out_dir, per_device_train_batch_size=bs, num_epochs=1, no_cuda=True,
                                            autoencoder_learning_rate=1e-4, discriminator_learning_rate=1e-4,
                                            discriminator_optimizer_params={'betas': (0.5, 0.9)})
        trainer = P['AdversarialTrainer'](model, data, training_config=cfg)
    else:
        cfg = P['BaseTrainerConfig'](output_dir=out_dir, per_device_train_batch_size=bs, num_epochs=1, learning_rate=1e-4, no_cuda=True)
        trainer = P['BaseTrainer'](model, data, training_config=cfg)
    trainer.prepare_training()
    t = time.perf_counter()
    trainer.train_step(epoch=1)
    return (time.perf_counter() - t) / steps


def dlatent_seconds_per_step(name, reference, images, bs, steps, threads):
    "Seconds per step of dlatent's engine, the loop alone."
    model = copy.deepcopy(reference)
    cfg = TrainConfig(steps=steps, batch_size=bs, log_every=min(steps, 25), progress=True, threads=threads, device='cpu')
    return fit(model, TensorDataset(images), cfg).seconds / steps


def networks_seconds_per_step(reference, images, bs, steps):
    "Seconds per step of the networks alone: encoder and decoder forward and backward on the same batches, no loss, no optimizer."
    model, x = copy.deepcopy(reference), images.float() / 255
    t = time.perf_counter()
    for i in range(steps):
        mu, logvar = model.encoder(x[i * bs:(i + 1) * bs])
        (model.decoder(mu + logvar).sum() + mu.sum() + logvar.sum()).backward()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--tiny', action='store_true', help='16x16 images, batches of 8, 3 steps, 2 pairs: runs in seconds (a smoke test)')
    ap.add_argument('--size', type=int, default=64); ap.add_argument('--batch_size', type=int, default=64)
    ap.add_argument('--steps', type=int, default=20); ap.add_argument('--pairs', type=int, default=5)
    ap.add_argument('--models', nargs='+', default=list(MODELS), choices=MODELS)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--floor', action='store_true', help="also time the networks alone (beta-VAE, beta-TCVAE): pythae's time over it bounds the speed-up")
    a = ap.parse_args()
    if a.tiny: a.size, a.batch_size, a.steps, a.pairs = 16, 8, 3, 2
    P, err = import_pythae()
    if P is None:
        print(f"pythae is not installed ({err}); this benchmark compares dlatent with it. Install it for this script only, e.g.\n"
              f"    pip install --target /tmp/pythae_site pythae && PYTHONPATH=/tmp/pythae_site python {' '.join(sys.argv)}\n"
              f"skipped.")
        return 0
    torch.set_num_threads(a.threads)
    from importlib.metadata import version, PackageNotFoundError
    try: pv = version('pythae')
    except PackageNotFoundError: pv = '?'
    print(f'{a.size}x{a.size} binary images, {a.steps} steps a run, {a.pairs} pairs, {a.threads} thread(s); '
          f'torch {torch.__version__}, pythae {pv}', flush=True)
    results, floors = {}, {}
    with tempfile.TemporaryDirectory() as out_dir:
        for name in a.models:
            bs = 2 * a.batch_size if name == 'factorvae' else a.batch_size
            g = torch.Generator().manual_seed(0)
            images = ((torch.rand(a.steps * bs, 1, a.size, a.size, generator=g) > 0.85) * 255).to(torch.uint8)
            torch.manual_seed(0)
            reference = build_vae(dlatent_config(name), nc=1, img_size=a.size)
            run = {'dlatent': lambda: dlatent_seconds_per_step(name, reference, images, bs, a.steps, a.threads),
                   'pythae': lambda: pythae_seconds_per_step(P, name, reference, images, bs, a.steps, a.size, out_dir)}
            if a.floor and name != 'factorvae': run['networks'] = lambda: networks_seconds_per_step(reference, images, bs, a.steps)
            for lib in run: run[lib]()                                    # warm up both (allocator, kernels, imports)
            ratios, bounds = [], []
            for p in range(a.pairs):
                t = {}
                for lib in (list(run) if p % 2 == 0 else list(run)[::-1]):
                    gc.collect(); t[lib] = run[lib]()
                ratios.append(t['pythae'] / t['dlatent'])
                if 'networks' in t: bounds.append(t['pythae'] / t['networks'])
                print(f'{name:9s} dlatent {1e3 * t["dlatent"]:7.1f} ms/step ({1 / t["dlatent"]:6.2f} steps/s)   pythae {1e3 * t["pythae"]:7.1f} '
                      f'ms/step ({1 / t["pythae"]:6.2f} steps/s)   pythae/dlatent {ratios[-1]:.3f}'
                      + (f'   pythae/networks alone {bounds[-1]:.3f}' if bounds else ''), flush=True)
            results[name] = statistics.median(ratios)
            if bounds: floors[name] = statistics.median(bounds)
    print('median speed-up of dlatent over pythae (pythae seconds per step / dlatent seconds per step) over '
          f'{a.pairs} pairs: ' + ', '.join(f'{k} {v:.2f}x' for k, v in results.items()))
    if floors:
        print('bound on any loop with these networks (pythae seconds per step / the networks alone, median): '
              + ', '.join(f'{k} {v:.2f}x' for k, v in floors.items()))
    return 0


if __name__ == '__main__': sys.exit(main())

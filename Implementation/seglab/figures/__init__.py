"""The README's figures, one module per figure (Implementation/figures.py is the command line):

  style.py     what every figure shares: fonts, saving, rows of image panels, the VOC colour
               map and a legend of the classes shown
  run.py       the run a figure reads (a train.py run folder; runs/demo by default)
  atrous.py    (a) atrous_fov.png       taps of an atrous 3x3 kernel, ASPP's fields of view
  network.py   (b) network.png          ResNet-101 + ASPP + MSC, sizes from a forward pass
  msc.py       (c) msc.png              each MSC branch's prediction and their max fusion
  crf.py       (d) crf_iterations.png   the dense CRF after 1, 5 and 10 mean-field iterations
  training.py  (e) training_curves.png  losses and the poly learning rate from log.csv
  scores.py    (f) per_class_iou.png    per-class IoU with and without the CRF
               (g) trimap.png           accuracy within a band around object boundaries

(c) and (d) also draw any RGB image, with its label map or without one (a photograph), from a
network (msc.msc_figure) or from logits at the image size (crf.crf_figure).
"""
